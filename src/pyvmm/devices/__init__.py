"""pyvmm.devices"""
