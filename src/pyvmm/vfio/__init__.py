"""pyvmm.vfio"""
