"""The store: byte layouts (docs/FORMAT.md), encryption, keys, creating and unlocking a store,
packs, generations and the writer lock, over the storage backend (backend/), through which
every store access goes.
"""
