"""tinychat's tests, one file per module (test_<module>.py); test_all.py at the root runs them."""
