"""The Hugging Face Trainer internals :class:`~bread_kernels.integrations.transformers.BreadTrainerMixin` relies on.

A peft model's base weights that a run trains must come back with its adapters wherever the Trainer loads a
checkpoint, and transformers offers no public hook there: ``train`` loads ``resume_from_checkpoint`` (after
``model_init`` rebuilt the model) in ``_load_from_checkpoint`` and the best checkpoint in ``_load_best_model``
(before ``on_train_end``), and only ``_save_checkpoint`` tells a checkpoint from the other ``save_model`` calls
(``push_to_hub``, the user's).  :class:`TrainerLoadHooks` overrides those three, each calling the Trainer's own
and one hook of its subclass; :func:`internals_problems` is the canary that lists what moved (tested).
"""

from __future__ import annotations

import inspect
import warnings

__all__ = ["TESTED_TRANSFORMERS", "TRAINER_METHODS", "internals_problems", "warn_if_moved", "TrainerLoadHooks"]

#: the transformers minor versions these overrides were written against and tested with
TESTED_TRANSFORMERS = ("5.25",)
#: the private Trainer methods overridden, with the parameters (after ``self``) each is called with
TRAINER_METHODS = {
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_best_model": (),
    "_save_checkpoint": ("model", "trial"),
}


def internals_problems(trainer_class=None) -> list[str]:
    """What of :data:`TRAINER_METHODS` the Trainer (``transformers.Trainer`` by default) lacks or calls otherwise:
    empty when the overrides fit."""
    if trainer_class is None:
        from transformers import Trainer as trainer_class
    problems = []
    for name, expected in TRAINER_METHODS.items():
        method = inspect.getattr_static(trainer_class, name, None)
        if method is None:
            problems.append(f"Trainer.{name} is gone")
            continue
        parameters = tuple(inspect.signature(method).parameters)[1:]
        if parameters[:len(expected)] != expected:
            problems.append(f"Trainer.{name} takes {parameters}, not {expected}")
    return problems


_warned = False


def warn_if_moved() -> None:
    """Once per process: warn where the installed transformers' Trainer does not have what the overrides need."""
    global _warned
    if _warned:
        return
    _warned = True
    problems = internals_problems()
    if problems:
        import transformers

        warnings.warn(f"bread_kernels: BreadTrainerMixin overrides private Trainer methods, written for transformers "
                      f"{', '.join(TESTED_TRANSFORMERS)}; this transformers {transformers.__version__} differs "
                      f"({'; '.join(problems)}), so a peft model's trained base weights may not come back with its "
                      "adapters at resume_from_checkpoint or load_best_model_at_end. Run tests/integrations/"
                      "test_trainer.py", RuntimeWarning, stacklevel=3)


class TrainerLoadHooks:
    """A Trainer base whose three overrides call the Trainer's own and a hook of the subclass:
    ``_before_checkpoint_load(checkpoint, model)`` before the Trainer loads ``model`` from ``checkpoint``
    (``resume_from_checkpoint`` outside DeepSpeed), which may return a function run once that load succeeded;
    ``_after_best_model_load()`` after it loaded the best checkpoint; and :attr:`saving_checkpoint` true while the
    Trainer saves a checkpoint."""

    #: whether the Trainer is saving a checkpoint now (its ``save_model`` calls inside ``_save_checkpoint``)
    saving_checkpoint: bool = False

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The Trainer's load of a checkpoint's weights, between the subclass's checks and its own load."""
        after = self._before_checkpoint_load(resume_from_checkpoint, model if model is not None else self.model)
        result = super()._load_from_checkpoint(resume_from_checkpoint, model)
        if after is not None:
            after()
        return result

    def _load_best_model(self):
        """The Trainer's load of the best checkpoint, then the subclass's."""
        super()._load_best_model()
        self._after_best_model_load()

    def _save_checkpoint(self, *args, **kwargs):
        """The Trainer's checkpoint, with :attr:`saving_checkpoint` set while it saves."""
        self.saving_checkpoint = True
        try:
            return super()._save_checkpoint(*args, **kwargs)
        finally:
            self.saving_checkpoint = False

    def _before_checkpoint_load(self, checkpoint: str, model):
        """Checks before the Trainer loads ``model`` from ``checkpoint``; returns what to run after its load, or
        None."""
        return None

    def _after_best_model_load(self) -> None:
        """Runs after the Trainer loaded the best checkpoint."""
