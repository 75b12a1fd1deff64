"""Tests of the Python client (clients/python): against a fake server, then the real one."""
