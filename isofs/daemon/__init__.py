"""The mount daemon: mounting and serving (serve.py), mount records (runtime.py) and the
status socket (control.py)."""
