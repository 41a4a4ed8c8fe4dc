"""Process peak RSS of the engine over several active-block positions in one process (the model suite's loop):
it must not grow by a model per position.  Usage: python bench/positions_rss.py 1,4,6 [BAdam|BREAD-SGD|...]"""
import resource, sys, warnings, copy, gc
warnings.simplefilter("ignore")
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import bread_kernels
from bread_kernels.bench.model import build_model, _optimizer
positions = [int(p) for p in sys.argv[1].split(",")]
variant = sys.argv[2] if len(sys.argv) > 2 else "BAdam"
base = build_model()
ids = torch.randint(0, 4096, (4, 256), generator=torch.Generator().manual_seed(0))
for active in positions:
    engine = bread_kernels.patch(copy.deepcopy(base)).train()
    opt = _optimizer(engine, variant, active)
    for _ in range(2):
        engine(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
    del engine, opt
    gc.collect()
print(f"{variant} positions={positions}: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MiB")
