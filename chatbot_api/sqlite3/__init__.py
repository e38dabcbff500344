"""SQLite for this chatbot: Django's backend, with one writer at a time per process (see `base`)."""
