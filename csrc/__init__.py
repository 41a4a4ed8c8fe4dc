# C++ sources of the native CPU backend; installed as the data package ``bread_kernels._csrc``.
