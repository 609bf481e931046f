"""pyvmm.boot"""
