"""Message-queue adapters behind one interface (see ``base``)."""
