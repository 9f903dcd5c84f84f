"""Backend registry: the config ``type`` names the module that implements it.

Each module defines ``Backend`` (a ``broker.backends.base.Backend`` subclass whose ``config_model``
validates its keys). Modules are imported only when a config names their type, so the cloud SDKs of
unconfigured stores are never loaded.
"""

from __future__ import annotations

import importlib

from broker.backends.base import Backend

REGISTRY: dict[str, str] = {
    "file": "broker.backends.file",
    "env": "broker.backends.env",
    "vault": "broker.backends.vault",
    "aws_secrets_manager": "broker.backends.aws_secrets_manager",
    "aws_ssm": "broker.backends.aws_ssm",
    "gcp_secret_manager": "broker.backends.gcp_secret_manager",
    "azure_key_vault": "broker.backends.azure_key_vault",
}

EXTRAS = {
    "vault": "vault",
    "aws_secrets_manager": "aws",
    "aws_ssm": "aws",
    "gcp_secret_manager": "gcp",
    "azure_key_vault": "azure",
}


def load_type(type_name: str) -> type[Backend]:
    """The Backend class for a config ``type``.

    Raises KeyError for an unknown type and ImportError when the module is missing from this build.
    """
    module = importlib.import_module(REGISTRY[type_name])
    cls: type[Backend] = module.Backend
    return cls
