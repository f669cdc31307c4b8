"""Model tests run offline on CPU with tiny random components: no Hugging Face downloads
(the root conftest sets offline mode and one thread per test)."""

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
