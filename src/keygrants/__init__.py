"""keygrants: a self-hosted key management service built around key grants."""

from __future__ import annotations

__version__ = "0.1.0"
