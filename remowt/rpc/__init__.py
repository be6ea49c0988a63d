"""remowt.rpc"""
