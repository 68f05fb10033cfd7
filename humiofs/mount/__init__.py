"""The read-only FUSE view: a FUSE-free model (tree, numbering, attrs, inodes, sources),
reading file data (reader, chunkcache, decryptd), listings (listing, prefetch), and the adapter
(fs, mount).
"""
