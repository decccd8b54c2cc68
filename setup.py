"""Only here to hand the cffi module to setuptools; metadata is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["vfiouser_net/_ffi_build.py:ffibuilder"])
