"""remowt.user"""
