"""Test support: real servers and processes started on free loopback ports."""
