"""BN folding, NNCF PTQ/QAT, accuracy-bounded quantization, per-layer INT8 error."""

import os

# NNCF compiles (or loads) a C++ extension on first use and gives up after 60 s by default. On a loaded 2-core
# machine a cold compile can take longer than that, and the qat stage then fails with
# ExtensionLoaderTimeoutException. A user's own setting still wins.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
