"""Checkpoint folders: `layout` (the folder contract, file names, the expert key, the one safe loader),
`save` (the two writers), `load` (full state dicts, weights into a model, training resume)."""
