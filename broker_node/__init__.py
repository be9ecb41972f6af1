"""A node of the connection broker cluster."""
