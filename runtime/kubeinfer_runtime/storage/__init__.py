"""Object-store access: ``uri`` parses model URIs (pure), ``fetch`` downloads them."""
