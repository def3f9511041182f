"""Stage placeholder: not implemented yet (registers nothing)."""
