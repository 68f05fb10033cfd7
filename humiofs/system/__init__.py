"""Where humiofs meets the host's service manager: systemd units and sd_notify.
"""
