"""Model backends behind one interface (``base.Backend``); ``registry`` picks one by format."""
