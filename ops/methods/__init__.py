"""Generation methods: one module per method, registered in ``ops.methods.registry``."""
