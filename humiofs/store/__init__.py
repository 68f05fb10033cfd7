"""The store: byte layouts (docs/FORMAT.md), encryption, keys, packs, generations and
the writer lock, over the storage backend (backend/).
"""
