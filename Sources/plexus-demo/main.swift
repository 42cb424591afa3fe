import Plexus
print("plexus")
