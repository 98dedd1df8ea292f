"""kopf handlers: thin, they call the layers below."""
