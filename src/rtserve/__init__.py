"""rtserve: a real-time HTTP/1.1 server for Python.

Every request has a deadline, counted from its first byte in to its last byte out, and
the server keeps it: a late handler gets a fallback sent for it, and overload is shed early
instead of making every request late.
"""

from .app import App, Route
from .config import Config, ConfigError
from .request import Request
from .response import FileBody, Response
from .server import Server, serve

__all__ = [
    "App",
    "Config",
    "ConfigError",
    "FileBody",
    "Request",
    "Response",
    "Route",
    "Server",
    "serve",
]
__version__ = "0.1.0"
