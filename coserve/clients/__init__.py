"""coserve's Python client (sync and async) and its CLI commands."""

from coserve.clients.client import AsyncClient, Client, extract_adapter
from coserve.clients.types import CoserveError

__all__ = ["AsyncClient", "Client", "CoserveError", "extract_adapter"]
