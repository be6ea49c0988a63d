"""remowt.deploy"""
