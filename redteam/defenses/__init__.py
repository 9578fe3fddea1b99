"""The defense plugins: each module here registers itself when the registry first looks up a name."""
