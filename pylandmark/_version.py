from importlib.metadata import PackageNotFoundError, version

# The same package ships as `pylandmark` (CPU) and `pylandmark-cu13` (CUDA); one is installed.
for _dist in ("pylandmark", "pylandmark-cu13"):
    try:
        __version__ = version(_dist)
        break
    except PackageNotFoundError:
        continue
else:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
