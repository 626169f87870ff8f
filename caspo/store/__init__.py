"""Preference pairs in Redis, and the redis-server the mesh starts when none is given."""
