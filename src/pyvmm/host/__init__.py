"""pyvmm.host"""
