"""Fuzz targets for pyvmm's guest-facing decoders (issue 9), shared by the suite and `make fuzz`.

The modules here are not collected by pytest themselves (no `test_` prefix): thin wrappers in
`tests/unit/test_fuzz_*.py` run them with the budget chosen by the PYVMM_FUZZ environment variable (see
`budget.py` and README.md). `tests/conftest.py` puts `tests/` on sys.path, which makes this package
importable as `fuzz`.
"""
