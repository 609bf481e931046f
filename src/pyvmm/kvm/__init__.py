"""pyvmm.kvm"""
