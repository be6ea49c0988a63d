"""remowt.protocol"""
