"""The torch this project needs, written in one place: checked when ``enact_ops`` is imported and
when ``setup.py`` builds the extension (not an ``install_requires``: pip would replace a CUDA
build of torch that a user installed for their driver).

torch >= 2.5 is needed for ``torch.library.custom_op`` / ``register_fake`` / ``register_autograd``
(the operators' registrations), ``torch.is_autocast_enabled(device_type)`` /
``torch.get_autocast_dtype`` (mixed precision) and ``torch.serialization.safe_globals``
(checkpoint loading).  The project is developed and tested with torch 2.14.1.
"""
MIN_TORCH = "2.5"
TESTED_TORCH = "2.14.1"


def check_torch(version=None) -> None:
    """Raise ImportError naming the required version when torch (``version``: its version string,
    default ``torch.__version__``) is older than ``MIN_TORCH``."""
    import torch
    from torch.torch_version import TorchVersion

    found = torch.__version__ if version is None else version
    if TorchVersion(found) < MIN_TORCH:
        raise ImportError(
            f"enact needs torch >= {MIN_TORCH} (tested with {TESTED_TORCH}), found torch {found}: it uses "
            "torch.library.custom_op / register_fake / register_autograd, torch.is_autocast_enabled(device_type) "
            "and torch.serialization.safe_globals.  Install a newer torch built for your CUDA "
            "(https://pytorch.org/get-started/locally/), then rebuild the extension (pip install -e .)."
        )
