"""Packaging: the Python package, plus ``csrc/`` installed as ``bread_kernels._csrc`` so the native backend can
compile it on first use (torch.utils.cpp_extension.load + ninja, cached) from any installation."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["bread_kernels", "bread_kernels.*"]) + ["bread_kernels._csrc"],
    package_dir={"bread_kernels._csrc": "csrc"},
    package_data={"bread_kernels._csrc": ["*.cpp", "*.h"]},
)
