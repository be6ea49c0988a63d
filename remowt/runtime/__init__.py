"""remowt.runtime"""
