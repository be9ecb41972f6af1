"""Python client SDK of the connection broker."""
