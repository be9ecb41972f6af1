"""Wire protocol of the connection broker: message types and codec, shared by node and client."""
