"""Training data: windows cut from scene folders (:mod:`.pairs`) and public SAR-optical datasets read in their
published layouts (:mod:`.datasets`)."""
