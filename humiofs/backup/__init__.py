"""Backing a node up: walking it (scan), writing generations (writer), checkpoints, and
the continuous run (watch, inotify).
"""
