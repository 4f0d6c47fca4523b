"""Device-side tools that run without torch (installed as edgessl.devicecheck): device_check.py."""
