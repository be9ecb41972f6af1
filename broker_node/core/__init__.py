"""The protocol decisions of a node: pure state and values, no asyncio, websockets or redis."""
