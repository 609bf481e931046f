"""pyvmm.lab"""
