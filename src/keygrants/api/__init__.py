"""The HTTP edge (native REST under ``/v1/``)."""

from __future__ import annotations

from keygrants.api.app import ENDPOINTS, Endpoint, HttpLimits, create_app

__all__ = ["ENDPOINTS", "Endpoint", "HttpLimits", "create_app"]
