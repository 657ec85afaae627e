"""dml-dist: distributed Deep Mutual Learning, one process per peer."""
__version__ = "0.1.0"

from .config import DEFAULT_CONFIG, create_dml_config  # noqa: E402
from .errors import DMLError  # noqa: E402
from .loss import compute_dml_loss  # noqa: E402
from .models import build_model  # noqa: E402
