"""The libraries the scripts at the top use; importing any of them does no work."""
