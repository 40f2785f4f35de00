"""`python -m retina.export`: runs retina.publish.export (its --help says what it does)."""
from retina.publish.export import main

if __name__ == '__main__':
    main()
