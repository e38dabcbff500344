"""The chat API app: models, services, the streaming core, providers, DRF views, the WebSocket."""

__version__ = "1.1.0"
